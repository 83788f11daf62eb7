// Adds, replaces or deletes a user's SCRAM-SHA-512 credential through the Admin API
// (AlterUserScramCredentials), for the secured test cluster. The tools jar that has
// ConfigCommand is not on Maven Central, so this is a single-file program on the broker's
// classpath:
//   java -cp 'libs/*' ScramUser.java BOOTSTRAP set USER PASSWORD
//   java -cp 'libs/*' ScramUser.java BOOTSTRAP delete USER
import java.util.List;
import java.util.Properties;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.ScramCredentialInfo;
import org.apache.kafka.clients.admin.ScramMechanism;
import org.apache.kafka.clients.admin.UserScramCredentialAlteration;
import org.apache.kafka.clients.admin.UserScramCredentialDeletion;
import org.apache.kafka.clients.admin.UserScramCredentialUpsertion;

public class ScramUser {
    public static void main(String[] args) throws Exception {
        boolean set = args.length == 4 && args[1].equals("set");
        boolean delete = args.length == 3 && args[1].equals("delete");
        if (!set && !delete) {
            System.err.println("usage: ScramUser BOOTSTRAP set USER PASSWORD | BOOTSTRAP delete USER");
            System.exit(2);
        }
        Properties props = new Properties();
        props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
        props.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "30000");
        UserScramCredentialAlteration alteration = set
            ? new UserScramCredentialUpsertion(args[2],
                new ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 4096), args[3])
            : new UserScramCredentialDeletion(args[2], ScramMechanism.SCRAM_SHA_512);
        try (Admin admin = Admin.create(props)) {
            admin.alterUserScramCredentials(List.of(alteration)).all().get();
        }
    }
}
